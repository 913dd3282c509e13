"""The order context: place, change items, confirm, pay, ship, cancel."""
