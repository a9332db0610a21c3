"""Kipekee's backends under Django's own mail tests.

This package is copied into the ``tests/`` directory of the Django source distribution
that matches the installed Django and run with Django's ``runtests.py`` (see
``tests/django_gate/run.py``). It holds no test of its own: it binds Django's test classes
to Kipekee's backends.
"""
