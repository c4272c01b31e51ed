"""Choosing providers: routes and strategies (`router`), per-provider health
(`health`, `breaker`) and the wrappers that feed it (`instrumented`)."""

from proxy.routing.router import Plan, Router, RouteSettings, RoutingSettings

__all__ = ["Plan", "RouteSettings", "Router", "RoutingSettings"]
