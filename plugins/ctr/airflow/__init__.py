"""The Airflow edge: the only subpackage that imports Airflow (tasks, hooks, links, notifier, config resolution)."""
