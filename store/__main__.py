import sys

from store.cli import dispatch

COMMANDS = {
    "extract": ("store.extract:main", "extract activations of a model over a dataset into a zarr store"),
    "info": ("store.activations:info_main", "print a store's attributes and arrays"),
    "users": ("store.cli:users_main", "user accounts: add NAME --role R [--password-stdin] | list | demo"),
    "db": ("store.cli:db_main", "the annotation database: upgrade | current"),
}

if __name__ == "__main__":
    sys.exit(dispatch("store", COMMANDS))
