"""The kernel both the API and the workers import: tables, database, settings, queue,
storage, errors and the job model. Imports neither the HTTP layer, the workers nor torch."""
