"""The outside review of the lean HTTP server (issue 18): each finding's reproducer, kept as the
test that shows the attack is stopped (both servers where it applies)."""
