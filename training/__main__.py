import sys

from store.cli import dispatch

COMMANDS = {
    "build-demo": ("training.demo:main", "build the demo patch dataset from the real CBIS-DDSM mammograms"),
    "fit": ("training.fit:main", "train a classifier from a YAML config, tracked in mlflow and registered"),
}

if __name__ == "__main__":
    sys.exit(dispatch("training", COMMANDS))
