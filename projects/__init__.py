"""Projects: trainers that reuse the shared pieces (core/, moe/, models/, training/) and write
only what is their own, as vmoe's projects do. Each is a trainer in trainers.py's table."""
