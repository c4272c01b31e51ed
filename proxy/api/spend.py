"""/v1/spend: totals over attempt rows. The admin sees all keys, a key its own."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from litestar import MediaType, Request, Response, get
from litestar.params import FromQuery, QueryParameter

from proxy.accounts.auth import principal_of, require_key
from proxy.accounts.spend_report import build_report, parse_bound
from proxy.api.deps import ApiDep
from proxy.api.errors import error_response
from proxy.schema import FieldError

GROUPS = ("key", "provider", "model", "day")


@get("/v1/spend", tags=["spend"], guards=[require_key],
     summary="Spend totals: cost, images, predictions, failed attempts",
     description="`from` inclusive, `to` exclusive (ISO date = midnight UTC). "
     "`format=csv` (or Accept: text/csv) for CSV.")
async def spend(
    request: Request[Any, Any, Any],
    api: ApiDep,
    group_by: FromQuery[str] = "provider",
    from_: Annotated[str | None, QueryParameter(name="from")] = None,
    to: FromQuery[str | None] = None,
    format: FromQuery[Literal["json", "csv"] | None] = None,
) -> Response[Any]:
    if group_by not in GROUPS:
        return error_response(422, "invalid query parameter", details=[FieldError(
            field="group_by", reason="unknown grouping", value=group_by,
            allowed=", ".join(GROUPS))])
    try:
        since = parse_bound(from_, "from")
        until = parse_bound(to, "to")
    except ValueError as exc:
        field, _, reason = str(exc).partition(": ")
        return error_response(422, "invalid query parameter", details=[
            FieldError(field=field, reason=reason, allowed="ISO date or datetime")])
    principal = principal_of(request)
    report = await build_report(api.service.store, group_by,  # type: ignore[arg-type]
                                since=since, until=until,
                                api_key_id=None if principal.sees_all else principal.key_id)
    wants_csv = format == "csv" or (
        format is None and "text/csv" in request.headers.get("accept", ""))
    if wants_csv:
        return Response(report.to_csv(), media_type="text/csv; charset=utf-8", headers={
            "Content-Disposition": f'attachment; filename="spend-by-{group_by}.csv"'})
    return Response(report.as_dict(), media_type=MediaType.JSON)
