"""Verifies one webhook delivery with the `standardwebhooks` package from PyPI, an
implementation of the Standard Webhooks specification independent of Tandem's.
Usage: verify_webhook.py SECRET ID TIMESTAMP SIGNATURE BODY_FILE
Exits 0 and prints "verified" when the delivery verifies; prints the error and exits 1 otherwise."""
import sys

from standardwebhooks.webhooks import Webhook


def main(secret, webhook_id, timestamp, signature, body_file):
    with open(body_file, "rb") as handle:
        body = handle.read()
    headers = {
        "webhook-id": webhook_id,
        "webhook-timestamp": timestamp,
        "webhook-signature": signature,
    }
    try:
        Webhook(secret).verify(body, headers)
    except Exception as error:  # the library raises WebhookVerificationError
        print(f"rejected: {error}")
        return 1
    print("verified")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:6]))
