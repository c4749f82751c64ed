"""Helpers the tests share: `service` (real services, the app in-process, files, polling), `cli`, `browser`."""
