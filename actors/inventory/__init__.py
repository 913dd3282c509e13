"""The inventory context: stock per SKU, received, adjusted, and reserved for orders."""
