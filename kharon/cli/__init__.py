def main() -> None:
    raise SystemExit("the kharon command is not built yet")
