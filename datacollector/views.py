"""Project-level API views that belong to no app."""

from rest_framework.authtoken.views import ObtainAuthToken
from rest_framework.settings import api_settings


class ObtainTokenView(ObtainAuthToken):
    """POST `username` and `password` (JSON or a form) for `{"token": ...}`."""

    # DRF's own view hard-codes its parsers (multipart included); use the API's.
    parser_classes = api_settings.DEFAULT_PARSER_CLASSES


obtain_token = ObtainTokenView.as_view()
