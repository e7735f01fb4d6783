"""The request's database session, as the routes take it (``SessionDep``).

Apart from ``cityedge_fleet.db`` so that the commands that only open a database
(``cityedge audit verify``, ``keys report``, ``fleet init-db``, ...) do not import the web
framework: FastAPI was a quarter of such a command's second of start-up.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlmodel import Session


def get_session(request: Request) -> Iterator[Session]:
    with Session(request.app.state.engine) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]
