"""Runtime helpers at the bottom of the layers: logging, console, Ray start-up, storage."""
