"""The Slack worker. Not built yet: enabling it reports an honest error in `status`."""

from agent.config import Config
from agent.worker import Worker, WorkerContext


class SlackWorker(Worker):
    name = "slack"

    def __init__(self, config: Config):
        self.config = config

    def initialize(self, ctx: WorkerContext) -> None:
        raise NotImplementedError("the slack worker is not part of this version yet")
