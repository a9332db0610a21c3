"""A project's test suite, as a Kipekee user would write it, run by Django's own test
runner (``manage.py test``) from tests/test_testmode.py: mail sent through Kipekee shows
up in ``django.core.mail.outbox``, whichever API sent it."""
