import sys

from store.cli import dispatch

COMMANDS = {
    "dissect": ("explain.dissection:main", "dataset-level IoU of every unit with the ground-truth concept masks"),
    "maps": ("explain.embeddings:main", "compute and cache the unit and image maps of a store"),
}

if __name__ == "__main__":
    sys.exit(dispatch("explain", COMMANDS))
