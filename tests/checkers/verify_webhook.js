// Verifies one webhook delivery with the `standardwebhooks` package from npm, an implementation
// of the Standard Webhooks specification independent of Tandem's.
// Usage: node verify_webhook.js SECRET ID TIMESTAMP SIGNATURE BODY_FILE
// Exits 0 and prints "verified" when the delivery verifies; prints the error and exits 1 otherwise.
const fs = require("fs");
const { Webhook } = require("standardwebhooks");

const [secret, id, timestamp, signature, bodyFile] = process.argv.slice(2);
const body = fs.readFileSync(bodyFile, "utf8");
try {
  new Webhook(secret).verify(body, {
    "webhook-id": id,
    "webhook-timestamp": timestamp,
    "webhook-signature": signature,
  });
  console.log("verified");
} catch (error) {
  console.log(`rejected: ${error.message}`);
  process.exit(1);
}
