"""ticrypt-lab: every role on one machine, for trying ticrypt and for tests."""
