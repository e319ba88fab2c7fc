"""The engine directory format: its manifest and file names, how programs are stored, and how they load."""
