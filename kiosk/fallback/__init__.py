"""Fallbacks: offline policy and cues, the durable message spool, delivery."""
