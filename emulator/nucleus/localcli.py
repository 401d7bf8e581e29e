"""The Greengrass CLI's IPC service: local deployments and components, answered by the runner.

The nucleus itself only routes these operations; the component runner (which knows the
components and applies deployments) answers them through a hooks object with any of::

    list_components() -> list[ComponentInfo]
    get_component_details(name: str) -> ComponentInfo | None        # None: not found
    restart_component(name: str) -> None                             # raise to report FAILED
    create_local_deployment(request: model.CreateLocalDeploymentRequest) -> str   # deployment id
    get_local_deployment_status(deployment_id: str) -> DeploymentInfo | None       # None: not found

Hooks run in the server's thread pool, so they may block. An operation whose hook is missing is
answered as the nucleus answers one without the CLI component: ``ServiceError`` "Operation
aws.greengrass#X is not supported by Greengrass". A hook raising a model error (e.g.
``model.InvalidArgumentsError``) passes it to the caller unchanged.

Authorization: ``aws.greengrass.Cli`` policies. Resources are the component name for
GetComponentDetails and RestartComponent, the deployment id for GetLocalDeploymentStatus; the
others take any policy that names the operation (``resources: ["*"]`` in the docs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from awsiot.greengrasscoreipc import model

from emulator.nucleus.accesscontrol import AccessControl


@dataclass
class ComponentInfo:
    name: str
    version: str
    state: str  # a model.LifecycleState value
    configuration: dict = field(default_factory=dict)

    def to_model(self) -> model.ComponentDetails:
        return model.ComponentDetails(component_name=self.name, version=self.version, state=self.state,
                                      configuration=self.configuration)


@dataclass
class DeploymentInfo:
    deployment_id: str
    status: str  # a model.DeploymentStatus value
    created_on: str | None = None  # MM/dd/yyyy hh:mm:ss, as the CLI writes it
    failure_cause: str | None = None

    def to_model(self) -> model.LocalDeployment:
        details = None
        if self.failure_cause is not None:
            details = model.DeploymentStatusDetails(detailed_deployment_status=model.DetailedDeploymentStatus.FAILED_NO_STATE_CHANGE,
                                                    deployment_failure_cause=self.failure_cause)
        return model.LocalDeployment(deployment_id=self.deployment_id, status=self.status,
                                     created_on=self.created_on, deployment_status_details=details)


class LocalCli:
    def __init__(self, acl: AccessControl, hooks: Any = None) -> None:
        self.acl = acl
        self.hooks = hooks

    def operations(self) -> dict:
        from emulator.nucleus.ipc import Operation
        ops = {
            "aws.greengrass#ListComponents": self._list,
            "aws.greengrass#GetComponentDetails": self._details,
            "aws.greengrass#RestartComponent": self._restart,
            "aws.greengrass#CreateLocalDeployment": self._deploy,
            "aws.greengrass#GetLocalDeploymentStatus": self._status,
        }
        return {name: Operation(fn, blocking=True) for name, fn in ops.items()}

    def _hook(self, call, name: str):
        fn = getattr(self.hooks, name, None)
        if fn is None:
            raise model.ServiceError(message=f"Operation {call.operation} is not supported by Greengrass")
        return fn

    def _list(self, call) -> model.ListComponentsResponse:
        call.authorize(None, self.acl)
        infos = self._hook(call, "list_components")()
        return model.ListComponentsResponse(components=[i.to_model() for i in infos])

    def _details(self, call) -> model.GetComponentDetailsResponse:
        name = call.request.component_name
        if not name:
            raise model.InvalidArgumentsError(message="componentName is required")
        call.authorize(name, self.acl)
        info = self._hook(call, "get_component_details")(name)
        if info is None:
            raise model.ResourceNotFoundError(message=f"Component {name} not found",
                                              resource_type="Component", resource_name=name)
        return model.GetComponentDetailsResponse(component_details=info.to_model())

    def _restart(self, call) -> model.RestartComponentResponse:
        name = call.request.component_name
        if not name:
            raise model.InvalidArgumentsError(message="componentName is required")
        call.authorize(name, self.acl)
        hook = self._hook(call, "restart_component")
        details = getattr(self.hooks, "get_component_details", None)
        if details is not None and details(name) is None:
            raise model.ResourceNotFoundError(message=f"Component {name} not found",
                                              resource_type="Component", resource_name=name)
        try:
            hook(name)
        except model.GreengrassCoreIPCError:
            raise
        except Exception as exc:
            return model.RestartComponentResponse(restart_status=model.RequestStatus.FAILED, message=str(exc))
        return model.RestartComponentResponse(restart_status=model.RequestStatus.SUCCEEDED)

    def _deploy(self, call) -> model.CreateLocalDeploymentResponse:
        call.authorize(None, self.acl)
        deployment_id = self._hook(call, "create_local_deployment")(call.request)
        return model.CreateLocalDeploymentResponse(deployment_id=deployment_id)

    def _status(self, call) -> model.GetLocalDeploymentStatusResponse:
        deployment_id = call.request.deployment_id
        if not deployment_id:
            raise model.InvalidArgumentsError(message="deploymentId is required")
        call.authorize(deployment_id, self.acl)
        info = self._hook(call, "get_local_deployment_status")(deployment_id)
        if info is None:
            raise model.ResourceNotFoundError(message=f"Deployment {deployment_id} not found",
                                              resource_type="LocalDeployment", resource_name=deployment_id)
        return model.GetLocalDeploymentStatusResponse(deployment=info.to_model())
