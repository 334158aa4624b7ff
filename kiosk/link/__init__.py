"""The link: voice-session API client, LiveKit room link, backoff."""
