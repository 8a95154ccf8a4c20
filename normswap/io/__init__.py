"""Reading and writing checkpoints: destination checks, atomic output folders."""
