"""The apps layer: the `ladder-clip` CLI, the demo and the int8 report, on top of the engine. Light on
purpose: `ladder-clip` imports only the standard library before main() runs."""
