"""Refusals: who asked may not do this (exit code 7 on the command line; HTTP 403 or 404
for the portal), or could not prove who they are (HTTP 401)."""

from __future__ import annotations

from calypso.errors import CalypsoError


class AccessError(CalypsoError):
    """A path outside the asker's proposals or the data roots, a link or virtual dataset
    leading out of the proposal, a saved flow that is not theirs: nothing was done."""

    exit_code = 7
    http_status = 403


class SignInError(AccessError):
    """A sign-in was refused: wrong password, a token that does not verify."""

    http_status = 401
