"""Helpers for the deploy-artifact tests (``test_deploy.py``, ``test_metrics_e2e.py``):
finding the external tools, running a real Prometheus, reading the queries out of the
dashboard, the alert rules and the KEDA ScaledObject."""
