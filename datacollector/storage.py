"""Static files: WhiteNoise's compressed storage with hashed names (written by collectstatic)."""

from whitenoise.storage import CompressedManifestStaticFilesStorage


class StaticStorage(CompressedManifestStaticFilesStorage):
    """Hashed, compressed copies and a manifest, made by `collectstatic` (the image build runs it).

    Before collectstatic has written a manifest (tests, a fresh checkout with DEBUG off), names are left
    as they are instead of failing every page that links a static file; with a manifest, a file missing
    from it is still an error, as in Django's own storage.
    """

    def stored_name(self, name: str) -> str:
        if not self.hashed_files:
            return name
        return super().stored_name(name)
