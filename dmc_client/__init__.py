"""A typed Python client of the dmc service (httpx): add classes and follow their jobs,
extend, remove and rename classes, predict, list, activate and delete versions, and manage
evaluation sets.

    from dmc_client import Client

    with Client("http://127.0.0.1:8000", api_key="...") as dmc:
        job = dmc.add_classes("photos/", wait=True)  # one folder per class; a progress bar
        print(dmc.predict(["cat.jpg"], top_k=3).predictions[0].classes)
"""

from dmc_client.client import Client
from dmc_client.errors import (
    ApiError,
    AuthenticationError,
    ConflictError,
    ConnectionFailedError,
    DmcClientError,
    InvalidRequestError,
    JobFailedError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    ServiceUnavailableError,
)
from dmc_client.models import (
    ClassInfo,
    Evaluation,
    EvaluationSet,
    ImagePrediction,
    Job,
    Predictions,
    Submission,
    Version,
    VersionsDeleted,
)

__all__ = [
    "ApiError",
    "AuthenticationError",
    "ClassInfo",
    "Client",
    "ConflictError",
    "ConnectionFailedError",
    "DmcClientError",
    "Evaluation",
    "EvaluationSet",
    "ImagePrediction",
    "InvalidRequestError",
    "Job",
    "JobFailedError",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "Predictions",
    "ServiceUnavailableError",
    "Submission",
    "Version",
    "VersionsDeleted",
]
