"""GET /: the upload page."""

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from ..deps import StateDep

router = APIRouter(include_in_schema=False)


@router.get("/", response_class=HTMLResponse)
def index(request: Request, state: StateDep):
    """The page, with a picker of the models loaded here (the default selected)."""
    model = state.model.describe() if state.model else None
    loaded = [m.describe() for name in state.models.loaded() if (m := state.models.get(name)) is not None]
    return request.app.state.templates.TemplateResponse(
        request, "index.html", {"model": model, "models": loaded, "problem": state.problem,
                                "max_bytes": state.settings.max_upload_bytes})
