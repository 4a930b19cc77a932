"""Issue 14 (6): the dashboard's ids past the database integer are refused (422, or 404
for a version that cannot exist) like the API's, never a 500."""

from __future__ import annotations

import base64

from tests.server.conftest import ADMIN_KEY, Server
from tests.server.test_predict import jpeg

HTTPS = "https://testserver"  # the session cookie is https-only


def test_dashboard_ids_past_the_database_integer_are_refused(server: Server) -> None:
    client = server.client
    signed_in = client.post(
        f"{HTTPS}/admin/login",
        data={"api_key": ADMIN_KEY, "next": "/admin/versions"},
        follow_redirects=False,
    )
    assert signed_in.status_code == 303, signed_in.text
    assert client.get(f"{HTTPS}/admin/versions").status_code == 200
    huge = 2**31
    for method, path in [
        ("GET", f"/admin/versions/{huge}"),
        ("GET", f"/admin/versions/{huge}/accuracy.png"),
        ("GET", f"/admin/versions/{huge}/calibration.png"),
        ("POST", f"/admin/versions/{huge}/activate"),
        ("POST", f"/admin/jobs/{huge}/cancel"),
    ]:
        response = client.request(method, f"{HTTPS}{path}", follow_redirects=False)
        assert response.status_code == 422, (method, path, response.text)
    # The JSON body of POST /predict too.
    response = client.post(
        "/predict",
        json={"images": [base64.b64encode(jpeg()).decode()], "version": huge},
        headers=server.headers("predict"),
    )
    assert response.status_code == 422, response.text
