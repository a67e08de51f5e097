"""Every error class has its status; an unexpected exception is a 500 with a JSON body and the server
keeps serving."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from adapterhub_local import errors as family
from adapterhub_local.registry import Registry
from adapterhub_local.server import errors
from tests.server.conftest import make_app

EXPECTED = {
    errors.AuthError: 401, errors.PromptTooLongError: 413, errors.RequestTimeoutError: 504,
    errors.OverloadedError: 503, family.FingerprintMismatchError: 409, family.ShapeMismatchError: 409,
    family.NotFoundError: 404, errors.UnknownModelError: 404, family.InvalidNameError: 404,
    family.InvalidReferenceError: 422, family.UnsupportedError: 400, family.IntegrityError: 500,
    family.FormatError: 500, family.AlreadyExistsError: 409,
}


@pytest.mark.parametrize(("cls", "status"), EXPECTED.items())
def test_status_of_each_class(cls: type[family.AdapterHubError], status: int) -> None:
    assert errors.status_of(cls("problem", "fix"))[0] == status
    response = errors.error_response(cls("the problem", "the fix"))
    assert response.status_code == status
    assert b"the problem" in response.body and b"the fix" in response.body


def test_config_error_is_422() -> None:
    assert errors.status_of(family.ConfigError(["a", "b"]))[0] == 422


def test_unknown_model_names_the_way_to_list_names() -> None:
    error = errors.unknown_model("ghost", family.NotFoundError("adapter 'ghost' is not registered"))
    assert "ghost" in str(error) and "/v1/models" in str(error) and errors.status_of(error)[0] == 404


def test_a_bug_is_a_500_and_the_server_survives(served_registry: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    app = make_app(served_registry)
    engine = app.state.server.engine

    def broken() -> list[object]:
        raise RuntimeError("boom")

    with TestClient(app, raise_server_exceptions=False) as client:
        monkeypatch.setattr(engine, "adapters", broken)
        response = client.get("/v1/models")
        assert response.status_code == 500 and response.json()["error"]["type"] == "server_error"
        monkeypatch.undo()
        assert client.get("/v1/models").status_code == 200
        ok = client.post("/v1/completions", json={"model": "lora0", "prompt": "x", "max_tokens": 2})
        assert ok.status_code == 200
