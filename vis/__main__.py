import sys

from store.cli import dispatch

COMMANDS = {
    "serve": ("vis.app:serve_main", "serve the workbench (development server; see README for gunicorn)"),
    "mlflow-ui": ("vis.app:mlflow_ui_main", "start the mlflow UI on the workspace's tracking store"),
    "worker": ("vis.jobs:worker_main", "a Celery worker for background jobs (team setup, CONCEPTLENS_CACHE_URL=redis://)"),
}

if __name__ == "__main__":
    sys.exit(dispatch("vis", COMMANDS))
