"""The signed-in customer's pages."""
