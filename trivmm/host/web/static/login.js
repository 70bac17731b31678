// The log-in page: carries ?next= into the form and says when the last try failed.
const params = new URLSearchParams(location.search);
document.getElementById("next").value = params.get("next") || "/";
document.getElementById("failed").hidden = params.get("failed") === null;
