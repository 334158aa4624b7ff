"""Audio: devices, capture and playout, echo cancellation, voice detection, the capture chain."""
