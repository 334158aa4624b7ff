"""The button and LED panel: gpiozero adapters, LED patterns, the virtual terminal panel."""
