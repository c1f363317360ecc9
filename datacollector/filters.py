"""Filter backends the API's views share."""

from rest_framework import filters
from rest_framework.exceptions import ValidationError
from rest_framework.request import Request


class SearchFilter(filters.SearchFilter):
    """DRF's search, whose refusal of a term (a NUL character, which PostgreSQL text cannot hold) is a
    400 naming the `search` parameter like every other refused parameter, not a bare list."""

    def get_search_terms(self, request: Request) -> list[str]:
        try:
            return super().get_search_terms(request)
        except ValidationError as exc:
            raise ValidationError({self.search_param: exc.detail}) from None
