"""Issue 14 (7): `dmc db upgrade` says which database it upgraded without its password."""

from __future__ import annotations

from sqlalchemy.engine import make_url
from typer.testing import CliRunner

from dmc_cli.main import app


def test_upgrade_masks_the_database_password(postgres_url: str) -> None:
    # The test server trusts local connections: any password is taken, and must not show.
    url = make_url(postgres_url).set(password="s3cret-Passw0rd")
    result = CliRunner().invoke(
        app, ["db", "upgrade", "--url", url.render_as_string(hide_password=False)]
    )
    assert result.exit_code == 0, result.output
    assert "s3cret-Passw0rd" not in result.output
    assert "***" in result.output and "is at revision head" in result.output
