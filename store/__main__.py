import sys

from store.cli import dispatch

COMMANDS = {
    "extract": ("store.extract:main", "extract activations of a model over a dataset into a zarr store"),
    "info": ("store.activations:info_main", "print a store's attributes and arrays"),
}

if __name__ == "__main__":
    sys.exit(dispatch("store", COMMANDS))
