"""What one ServiceAccount may do, read off the RBAC objects of a rendered chart, decided as the
API server's RBAC authorizer decides it: for the API emulator to enforce (``kube.authorize``).

Covered: Roles and ClusterRoles bound by RoleBindings and ClusterRoleBindings, verbs, API groups,
resources with their subresources, resourceNames, and the escalation check on Roles and
RoleBindings (a user may grant only what it holds itself; the ``escalate`` and ``bind`` verbs are
not emulated). Not covered: aggregation, non-resource URLs (discovery is always allowed).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import kmock
from kube_emulator import ROLES, api_call


@dataclasses.dataclass(frozen=True)
class Access:
    """One request as the authorizer sees it."""

    verb: str
    group: str
    resource: str
    """The plural, with its subresource: "grporuns/status"."""
    namespace: str | None
    """None: a cluster-scoped object, or a namespaced resource across all namespaces."""
    name: str | None = None


@dataclasses.dataclass(frozen=True)
class Grant:
    """One verb on one resource that a rule grants, in one namespace (None: cluster-wide)."""

    verb: str
    group: str
    resource: str
    namespace: str | None
    names: frozenset[str] = frozenset()
    """The rule's resourceNames; empty: any object."""

    def allows(self, access: Access) -> bool:
        return (
            (self.verb, self.group, self.resource) == (access.verb, access.group, access.resource)
            and self.namespace in (None, access.namespace)
            and (not self.names or access.name in self.names)
        )


def access_of(request: kmock.Request) -> Access | None:
    """The access a request to the emulator asks for; None for discovery."""
    call = api_call(request)
    if call is None:
        return None
    return Access(call.verb, request.resource.group, call.resource, request.namespace, request.name or None)


def grants_of(rules: Iterable[Mapping[str, Any]], namespace: str | None) -> Iterator[Grant]:
    """Each verb × group × resource of RBAC ``rules`` (no wildcards: this chart writes none)."""
    for rule in rules:
        for verb in rule["verbs"]:
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    yield Grant(verb, group, resource, namespace, frozenset(rule.get("resourceNames") or ()))


class Permissions:
    """What one ServiceAccount may do."""

    def __init__(self, account: tuple[str, str], grants: Iterable[Grant]):
        self.account = account
        self.grants = frozenset(grants)

    @classmethod
    def of(cls, objects: Iterable[Mapping[str, Any]], namespace: str, name: str) -> Permissions:
        """The permissions of ServiceAccount ``namespace/name`` under the RBAC objects among ``objects``."""
        objects = list(objects)
        rules = {(obj["kind"], obj["metadata"].get("namespace"), obj["metadata"]["name"]): obj.get("rules") or []
                 for obj in objects if obj["kind"] in ("Role", "ClusterRole")}
        subject = {"kind": "ServiceAccount", "name": name, "namespace": namespace}
        grants = []
        for binding in objects:
            if binding["kind"] not in ("RoleBinding", "ClusterRoleBinding") or subject not in binding.get("subjects", []):
                continue
            scope = binding["metadata"]["namespace"] if binding["kind"] == "RoleBinding" else None
            ref = binding["roleRef"]
            bound = rules[(ref["kind"], scope if ref["kind"] == "Role" else None, ref["name"])]
            grants.extend(grants_of(bound, scope))
        return cls((namespace, name), grants)

    def allows(self, access: Access) -> bool:
        return any(grant.allows(access) for grant in self.grants)

    def holds(self, grant: Grant) -> bool:
        """Whether this account holds everything ``grant`` gives, so that it may give it to another."""
        return all(self.allows(Access(grant.verb, grant.group, grant.resource, grant.namespace, name))
                   for name in grant.names or [None])

    def denial(self, request: kmock.Request, read: Callable[..., Mapping[str, Any] | None]) -> str | None:
        """Why the API server would refuse this account ``request`` (HTTP 403), or None. ``read``
        reads an object as stored (the emulator's read_object): the Role a RoleBinding names."""
        access = access_of(request)
        if access is None:
            return None
        user = f"system:serviceaccount:{self.account[0]}:{self.account[1]}"
        where = f' in the namespace "{access.namespace}"' if access.namespace else " at the cluster scope"
        if not self.allows(access):
            return (f'{access.resource} is forbidden: User "{user}" cannot {access.verb} resource '
                    f'"{access.resource}" in API group "{access.group}"{where}')
        missing = [grant for grant in self._granted_by(request, access, read) if not self.holds(grant)]
        if missing:
            return (f'{access.resource} is forbidden: user "{user}" is attempting to grant RBAC permissions '
                    f"not currently held: {missing}")
        return None

    @staticmethod
    def _granted_by(request: kmock.Request, access: Access, read: Callable[..., Any]) -> list[Grant]:
        """What a create or change of a Role or RoleBinding would grant."""
        body = request.data if isinstance(request.data, dict) else {}
        if access.group != "rbac.authorization.k8s.io" or access.verb not in ("create", "update", "patch"):
            return []
        if access.resource == "roles":
            return list(grants_of(body.get("rules") or [], access.namespace))
        if access.resource == "rolebindings" and "roleRef" in body:
            role = read(ROLES, access.namespace, body["roleRef"]["name"]) or {}
            return list(grants_of(role.get("rules") or [], access.namespace))
        return []
