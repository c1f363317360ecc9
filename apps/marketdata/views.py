from rest_framework.decorators import api_view
from rest_framework.request import Request
from rest_framework.response import Response


@api_view(["GET"])
def ohlcv(request: Request) -> Response:
    return Response({"detail": "Not implemented yet."}, status=501)


@api_view(["GET"])
def indicators(request: Request) -> Response:
    return Response({"detail": "Not implemented yet."}, status=501)
