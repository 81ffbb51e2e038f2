"""The HTTP layer: the request guard, dependencies, polling, connection limits, request
validation, pagination, problem+json rendering and the HTML kit of the pages."""
