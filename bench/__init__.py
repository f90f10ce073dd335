"""gbsd benchmark harness: `python -m bench --help`. Not part of the `gbsd_core` package (it imports diffusers)."""
