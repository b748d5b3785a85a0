"""thermocal's stages: plain logic, and the thin Prefect tasks around it."""
