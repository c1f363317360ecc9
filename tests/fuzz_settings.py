"""Settings of the server that tests/test_openapi_fuzz.py starts: the project's, with fast password hashing.

The fuzzer posts hundreds of made-up logins to the token endpoint, and Django hashes each password even
for an unknown user (so that timing does not tell which users exist): PBKDF2 would spend ~0.25 s on
each. The tests' own process hashes with MD5 for the same reason (tests/conftest.py).
"""

from datacollector.settings import *  # noqa: F403

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
