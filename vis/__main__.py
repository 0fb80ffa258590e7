import sys

from store.cli import dispatch

COMMANDS = {
    "serve": ("vis.app:serve_main", "serve the workbench (development server; see README for gunicorn)"),
    "mlflow-ui": ("vis.app:mlflow_ui_main", "start the mlflow UI on the workspace's tracking store"),
    "worker": ("vis.jobs:worker_main", "the Celery worker for background jobs (team setup, CONCEPTLENS_CACHE_URL=redis://)"),
    "team": ("vis.team:team_main", "the team stack: mlflow + annotations on PostgreSQL, Celery/Redis, gunicorn (docs/TEAM.md)"),
}

if __name__ == "__main__":
    sys.exit(dispatch("vis", COMMANDS))
