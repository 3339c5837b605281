"""The service's base: settings, the error tree, the CPU pool and admission, allocator tuning, process setup.

Imports nothing of the project's (the standard library and third-party packages only).
"""
