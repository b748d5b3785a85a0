"""thermocal's Prefect flow and its command line."""
