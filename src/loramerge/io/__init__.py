"""Reading and writing adapters and output folders."""
