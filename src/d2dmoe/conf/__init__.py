"""The configs (Hydra's config groups, read as pkg://d2dmoe.conf); `CONF` is their folder."""
from pathlib import Path

CONF = Path(__file__).resolve().parent
