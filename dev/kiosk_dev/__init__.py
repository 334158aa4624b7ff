"""The local stack for the demo and the tests: virtual sound devices and room, LiveKit server, stand-ins."""
