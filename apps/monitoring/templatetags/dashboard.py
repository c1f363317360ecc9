from typing import Any

from django import template

from apps.monitoring.dashboard import fleet_summary

register = template.Library()


@register.simple_tag
def fleet_dashboard() -> dict[str, Any]:
    """The operator's dashboard's first paint (`apps.monitoring.dashboard.fleet_summary`)."""
    return fleet_summary()
